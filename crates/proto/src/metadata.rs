//! Protocol 1.1's metadata: the application's own fields, carried with a
//! transfer (PROTOCOL.md section 4.3). Keys are short UTF-8 strings, unique
//! within a transfer; values are bytes. A transfer of minor 1 may carry
//! metadata alone, with no segment.
#![forbid(unsafe_code)]

use crate::limits::{MAX_METADATA_KEY_LEN, MAX_METADATA_LEN};
use crate::message::FieldError;

/// One field: a key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1 to [`MAX_METADATA_KEY_LEN`] bytes of UTF-8, no NUL.
    pub key: String,
    /// Any bytes.
    pub value: Vec<u8>,
}

/// A transfer's metadata: entries in the order the sender gave them, each
/// key at most once.
///
/// ```
/// use sealpass_proto::Metadata;
///
/// let mut metadata = Metadata::new();
/// metadata.insert("frame", "42");
/// metadata.insert("dtype", "<f4");
/// metadata.insert("frame", "43"); // replaces, in place
/// assert_eq!(metadata.get_str("frame"), Some("43"));
/// assert_eq!(metadata.iter().map(|(key, _)| key).collect::<Vec<_>>(), ["frame", "dtype"]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    entries: Vec<Entry>,
}

impl Metadata {
    /// No entries.
    pub fn new() -> Metadata {
        Metadata::default()
    }

    /// Sets `key` to `value`: replaces the value of a key already there
    /// (keeping its place, and returning the old value), or appends.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Option<Vec<u8>> {
        let key = key.into();
        let value = value.into();
        match self.entries.iter_mut().find(|entry| entry.key == key) {
            Some(entry) => Some(std::mem::replace(&mut entry.value, value)),
            None => {
                self.entries.push(Entry { key, value });
                None
            }
        }
    }

    /// [`Metadata::insert`], by value.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Metadata {
        self.insert(key, value);
        self
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|entry| entry.key == key)
            .map(|entry| entry.value.as_slice())
    }

    /// The value of `key`, where it is UTF-8.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// The entries, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> + Clone {
        self.entries
            .iter()
            .map(|entry| (entry.key.as_str(), entry.value.as_slice()))
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, owned.
    pub fn into_entries(self) -> Vec<Entry> {
        self.entries
    }

    /// Bytes the metadata takes on the wire (its count included): at most
    /// [`MAX_METADATA_LEN`].
    pub fn encoded_len(&self) -> usize {
        encoded_len(self.iter())
    }
}

impl<K: Into<String>, V: Into<Vec<u8>>> FromIterator<(K, V)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Metadata {
        let mut metadata = Metadata::new();
        for (key, value) in entries {
            metadata.insert(key, value);
        }
        metadata
    }
}

/// Metadata entries, listed without being copied: what a sender encodes
/// straight into its message (each value is copied once, into the message).
/// [`Metadata`] is one; so are slices of `(&str, &[u8])` and `(&str, &str)`
/// pairs, for values the caller holds already.
///
/// ```
/// use sealpass_proto::metadata::Fields;
///
/// let frame = 42u64.to_le_bytes();
/// let fields: &[(&str, &[u8])] = &[("frame", &frame), ("codec", b"raw")];
/// assert_eq!(fields.entries().len(), 2);
/// ```
pub trait Fields {
    /// The entries, in order.
    fn entries(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> + Clone;
}

impl Fields for Metadata {
    fn entries(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> + Clone {
        self.iter()
    }
}

impl Fields for [(&str, &[u8])] {
    fn entries(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> + Clone {
        self.iter().map(|&(key, value)| (key, value))
    }
}

impl Fields for [(&str, &str)] {
    fn entries(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> + Clone {
        self.iter().map(|&(key, value)| (key, value.as_bytes()))
    }
}

impl<const N: usize> Fields for [(&str, &[u8]); N] {
    fn entries(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> + Clone {
        self.as_slice().entries()
    }
}

impl<const N: usize> Fields for [(&str, &str); N] {
    fn entries(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> + Clone {
        self.as_slice().entries()
    }
}

/// No metadata: a transfer of segments alone.
impl Fields for () {
    fn entries(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> + Clone {
        std::iter::empty()
    }
}

/// Bytes `entries` take on the wire: a `u64` count, then per entry a `u64`
/// length and the key, a `u64` length and the value.
pub(crate) fn encoded_len<'a>(entries: impl Iterator<Item = (&'a str, &'a [u8])>) -> usize {
    entries.fold(8usize, |total, (key, value)| {
        total
            .saturating_add(16)
            .saturating_add(key.len())
            .saturating_add(value.len())
    })
}

/// Appends `entries` as the wire encodes them.
pub(crate) fn encode_into<'a>(
    entries: impl ExactSizeIterator<Item = (&'a str, &'a [u8])>,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (key, value) in entries {
        out.extend_from_slice(&(key.len() as u64).to_le_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        out.extend_from_slice(value);
    }
}

/// Why bytes are not a metadata list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataDecodeError {
    /// More entries declared than the bytes after the count can hold.
    #[error(
        "the metadata list declares {declared} entries; the {room} bytes after its count hold at most {}",
        room / 16
    )]
    TooManyEntries {
        /// The count declared.
        declared: u64,
        /// Bytes after the count.
        room: usize,
    },
    /// The bytes end inside the list.
    #[error("the metadata list ends {needed} bytes short of its {what}")]
    Short {
        /// What was being read.
        what: &'static str,
        /// Bytes missing.
        needed: usize,
    },
    /// A key is not UTF-8.
    #[error("metadata key {index} is not UTF-8")]
    KeyNotUtf8 {
        /// The entry's position.
        index: usize,
    },
}

/// Decodes a metadata list from the start of `bytes`; returns it and the
/// bytes it took. Allocates only for entries whose bytes are there: a
/// declared count or length larger than what follows is an error before
/// anything is allocated for it.
pub(crate) fn decode(bytes: &[u8]) -> Result<(Metadata, usize), MetadataDecodeError> {
    let mut rest = bytes;
    let count = take_u64(&mut rest, "entry count")?;
    // Each entry takes at least its two lengths.
    if count > (rest.len() / 16) as u64 {
        return Err(MetadataDecodeError::TooManyEntries {
            declared: count,
            room: rest.len(),
        });
    }
    let mut entries = Vec::with_capacity(count as usize);
    for index in 0..count as usize {
        let key = take_bytes(&mut rest, "key")?;
        let key = std::str::from_utf8(key)
            .map_err(|_| MetadataDecodeError::KeyNotUtf8 { index })?
            .to_owned();
        let value = take_bytes(&mut rest, "value")?.to_vec();
        entries.push(Entry { key, value });
    }
    Ok((Metadata { entries }, bytes.len() - rest.len()))
}

fn take_u64(rest: &mut &[u8], what: &'static str) -> Result<u64, MetadataDecodeError> {
    let (head, tail) = rest
        .split_first_chunk::<8>()
        .ok_or_else(|| MetadataDecodeError::Short {
            what,
            needed: 8usize.saturating_sub(rest.len()),
        })?;
    *rest = tail;
    Ok(u64::from_le_bytes(*head))
}

fn take_bytes<'a>(
    rest: &mut &'a [u8],
    what: &'static str,
) -> Result<&'a [u8], MetadataDecodeError> {
    let len = take_u64(rest, what)?;
    let available = rest.len();
    let len = usize::try_from(len)
        .ok()
        .filter(|len| *len <= available)
        .ok_or_else(|| MetadataDecodeError::Short {
            what,
            needed: usize::try_from(len)
                .unwrap_or(usize::MAX)
                .saturating_sub(available),
        })?;
    let (taken, tail) = rest.split_at(len);
    *rest = tail;
    Ok(taken)
}

/// Checks metadata against the protocol's rules (PROTOCOL.md section 4.3):
/// each key 1 to [`MAX_METADATA_KEY_LEN`] bytes with no NUL, keys unique
/// (compared byte by byte), and at most [`MAX_METADATA_LEN`] bytes encoded.
pub fn validate_metadata<'a>(
    entries: impl ExactSizeIterator<Item = (&'a str, &'a [u8])> + Clone,
) -> Result<(), FieldError> {
    if entries.len() == 0 {
        return Ok(());
    }
    let len = encoded_len(entries.clone());
    if len > MAX_METADATA_LEN {
        return Err(FieldError::MetadataTooLarge { len });
    }
    for (index, (key, _)) in entries.clone().enumerate() {
        if key.is_empty() {
            return Err(FieldError::EmptyMetadataKey { index });
        }
        if key.len() > MAX_METADATA_KEY_LEN {
            return Err(FieldError::MetadataKeyTooLong {
                index,
                len: key.len(),
            });
        }
        if key.contains('\0') {
            return Err(FieldError::MetadataKeyHasNul {
                index,
                key: key.to_owned(),
            });
        }
    }
    // Sorted positions find a repeat in O(n log n), for at most the few
    // thousand entries the size limit allows.
    let keys: Vec<&str> = entries.map(|(key, _)| key).collect();
    let mut order: Vec<usize> = (0..keys.len()).collect();
    let key_at = |position: usize| keys.get(position).copied().unwrap_or("");
    order.sort_unstable_by(|&a, &b| {
        key_at(a)
            .as_bytes()
            .cmp(key_at(b).as_bytes())
            .then(a.cmp(&b))
    });
    let repeat = order
        .windows(2)
        .filter_map(|pair| match pair {
            [first, later] if key_at(*first) == key_at(*later) => Some((*first, *later)),
            _ => None,
        })
        .min_by_key(|&(_, later)| later);
    match repeat {
        Some((first, index)) => Err(FieldError::DuplicateMetadataKey {
            first,
            index,
            key: key_at(index).to_owned(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode as decode_message, encode};
    use crate::message::{Message, Segment, Transfer};
    use crate::seals::Seals;

    fn check(entries: &[(&str, &[u8])], expected: Result<(), FieldError>) {
        assert_eq!(
            validate_metadata(entries.iter().copied()),
            expected,
            "{entries:?}"
        );
    }

    #[test]
    fn the_rules_of_section_4_3() {
        let long_key = "k".repeat(MAX_METADATA_KEY_LEN + 1);
        let longest_key = "k".repeat(MAX_METADATA_KEY_LEN);
        // One value that brings the whole to exactly the limit, and one byte more.
        let filler = MAX_METADATA_LEN - 8 - 16 - 1;
        let fits = vec![0u8; filler];
        let over = vec![0u8; filler + 1];
        check(&[], Ok(()));
        check(&[("frame", b"42"), ("dtype", b"<f4")], Ok(()));
        check(&[(longest_key.as_str(), b"")], Ok(()));
        check(&[("v", &fits)], Ok(()));
        check(
            &[("", b"x")],
            Err(FieldError::EmptyMetadataKey { index: 0 }),
        );
        check(
            &[("a", b""), (long_key.as_str(), b"")],
            Err(FieldError::MetadataKeyTooLong {
                index: 1,
                len: MAX_METADATA_KEY_LEN + 1,
            }),
        );
        check(
            &[("a\0b", b"")],
            Err(FieldError::MetadataKeyHasNul {
                index: 0,
                key: "a\0b".into(),
            }),
        );
        check(
            &[("a", b"1"), ("b", b"2"), ("a", b"3"), ("b", b"4")],
            Err(FieldError::DuplicateMetadataKey {
                first: 0,
                index: 2,
                key: "a".into(),
            }),
        );
        check(
            &[("v", &over)],
            Err(FieldError::MetadataTooLarge {
                len: MAX_METADATA_LEN + 1,
            }),
        );
    }

    #[test]
    fn a_transfer_may_carry_metadata_alone_and_it_survives_the_wire() {
        let metadata = Metadata::new()
            .with("frame", "42")
            .with("bytes", [0u8, 159, 146, 150]);
        let alone = Message::Transfer(Transfer::new(5, vec![]).with_metadata(metadata.clone()));
        assert_eq!(
            decode_message(&encode(&alone).unwrap()).unwrap().message,
            alone
        );
        let neither = Message::Transfer(Transfer::new(5, vec![]));
        assert_eq!(
            encode(&neither).unwrap_err().to_string(),
            FieldError::NoSegments.to_string()
        );
        let both = Message::Transfer(
            Transfer::new(6, vec![Segment::new("s", 1, Seals::SENDER_DEFAULT)])
                .with_metadata(metadata),
        );
        assert_eq!(
            decode_message(&encode(&both).unwrap()).unwrap().message,
            both
        );
    }

    #[test]
    fn declared_lengths_past_the_bytes_fail_before_allocating() {
        for (bytes, expected) in [
            (
                vec![1, 0, 0],
                "the metadata list ends 5 bytes short of its entry count",
            ),
            (
                [2u64.to_le_bytes(), 0u64.to_le_bytes(), 0u64.to_le_bytes()].concat(),
                "the metadata list declares 2 entries; the 16 bytes after its count hold at most 1",
            ),
            (
                [
                    1u64.to_le_bytes(),
                    u64::MAX.to_le_bytes(),
                    0u64.to_le_bytes(),
                ]
                .concat(),
                "the metadata list ends 18446744073709551607 bytes short of its key",
            ),
            (
                [
                    &1u64.to_le_bytes()[..],
                    &1u64.to_le_bytes(),
                    b"\xff",
                    &0u64.to_le_bytes(),
                ]
                .concat(),
                "metadata key 0 is not UTF-8",
            ),
        ] {
            assert_eq!(
                decode(&bytes).unwrap_err().to_string(),
                expected,
                "{bytes:02x?}"
            );
        }
    }
}

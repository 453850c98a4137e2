//! Framing and encoding of messages. The only module that calls bincode.
//!
//! A message is a 12-byte preamble then a body:
//!
//! ```text
//! offset  size  field
//!      0     4  magic     "SLPS"
//!      4     2  major     u16 little-endian
//!      6     2  minor     u16 little-endian
//!      8     4  body_len  u32 little-endian, bytes that follow the preamble
//!     12     n  body      bincode 2, fixed-width little-endian integers
//! ```
//!
//! Forward compatibility: a newer minor version may append fields to the end
//! of the body. An older peer decodes the fields it knows and skips the rest,
//! which `body_len` bounds; a peer of the same or an older minor gets no such
//! slack, and trailing body bytes are an error.
#![forbid(unsafe_code)]

use bincode::config::{Configuration, Fixint, Limit, LittleEndian};

use crate::limits::{MAX_BODY_LEN, MAX_MESSAGE_LEN, PREAMBLE_LEN};
use crate::message::{FieldError, Message, RejectReason, Segment};

/// The four bytes every message starts with.
pub const MAGIC: [u8; 4] = *b"SLPS";

/// A protocol version. Peers of one major interoperate; minors only append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Incompatible changes.
    pub major: u16,
    /// Compatible additions.
    pub minor: u16,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The version this crate speaks: 1.1 (metadata). It writes each message
/// at the lowest minor that has its fields, so every message without
/// metadata is the same bytes a 1.0 peer writes (PROTOCOL.md section 8).
pub const VERSION: Version = Version { major: 1, minor: 1 };

/// The minor that added `Transfer.metadata`.
const METADATA_MINOR: u16 = 1;

type BodyConfig = Configuration<LittleEndian, Fixint, Limit<MAX_BODY_LEN>>;

const fn body_config() -> BodyConfig {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<MAX_BODY_LEN>()
}

/// A message this side refuses to put on the wire.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A field breaks a rule of the protocol.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// The encoded body is over the limit.
    #[error(
        "the encoded message would be over the {MAX_MESSAGE_LEN}-byte limit \
         (its body: more than {MAX_BODY_LEN} bytes)"
    )]
    TooLarge,
    /// The encoder failed for another reason. It never does for a valid
    /// message: this is a bug, reported rather than hidden.
    #[error("encoding failed: {detail}")]
    Encoder {
        /// What the encoder said.
        detail: String,
    },
}

/// Why bytes received are not a message of this protocol. Each variant keeps
/// the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than a preamble.
    #[error("message of {len} bytes is shorter than the {PREAMBLE_LEN}-byte preamble")]
    ShortPreamble {
        /// Bytes received.
        len: usize,
    },
    /// The first four bytes are not [`MAGIC`].
    #[error("bad magic {found:02x?}; expected {MAGIC:02x?} (\"SLPS\")")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A major version this side does not speak.
    #[error("unsupported protocol version {found}; this side speaks {}.x", VERSION.major)]
    UnsupportedVersion {
        /// The version found.
        found: Version,
    },
    /// The preamble declares a body over the limit.
    #[error("declared body of {declared} bytes; expected at most {MAX_BODY_LEN}")]
    BodyTooLarge {
        /// The declared length.
        declared: u32,
    },
    /// Fewer body bytes arrived than the preamble declares.
    #[error("declared body of {declared} bytes but only {actual} arrived")]
    TruncatedBody {
        /// The declared length.
        declared: u32,
        /// The bytes that arrived after the preamble.
        actual: usize,
    },
    /// More bytes arrived than the preamble declares.
    #[error("declared body of {declared} bytes but {actual} arrived")]
    TrailingBytes {
        /// The declared length.
        declared: u32,
        /// The bytes that arrived after the preamble.
        actual: usize,
    },
    /// The body is not a v1 message.
    #[error("body is not a valid message: {detail}")]
    Body {
        /// What bincode reported.
        detail: String,
    },
    /// The body holds bytes after the message, and the peer's minor version is
    /// not newer than ours (so it may not append fields).
    #[error("{extra} bytes after the end of the message in a version {version} body")]
    TrailingBodyBytes {
        /// The bytes left over.
        extra: usize,
        /// The peer's version.
        version: Version,
    },
    /// The body decoded, but a field breaks a rule of the protocol.
    #[error("{error}")]
    Field {
        /// The id of the message that was decoded (a transfer's own id; 0
        /// when that id is the field at fault).
        id: u64,
        /// The rule broken.
        error: FieldError,
    },
}

impl DecodeError {
    /// The reason a receiver gives when a message fails to decode this way.
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            DecodeError::ShortPreamble { .. } | DecodeError::TruncatedBody { .. } => {
                RejectReason::Truncated
            }
            DecodeError::BadMagic { .. } => RejectReason::BadMagic,
            DecodeError::UnsupportedVersion { .. } => RejectReason::UnsupportedVersion,
            DecodeError::BodyTooLarge { .. } => RejectReason::TooLarge,
            DecodeError::TrailingBytes { .. } => RejectReason::TrailingBytes,
            DecodeError::Body { .. } | DecodeError::TrailingBodyBytes { .. } => {
                RejectReason::Malformed
            }
            DecodeError::Field { error, .. } => error.reject_reason(),
        }
    }

    /// The id a `Reject` of this message repeats (PROTOCOL.md section 4.1):
    /// the decoded message's id once the body decoded (a field rule broken),
    /// 0 when the failure came before the id could be read.
    pub fn reject_id(&self) -> u64 {
        match self {
            DecodeError::Field { id, .. } => *id,
            _ => 0,
        }
    }

    /// Whether the connection must close after the reject: a peer of another
    /// major version cannot be expected to understand anything further.
    pub fn closes_connection(&self) -> bool {
        matches!(self, DecodeError::UnsupportedVersion { .. })
    }
}

/// A decoded message and the version its sender wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The sender's version, from the preamble.
    pub version: Version,
    /// The message.
    pub message: Message,
}

/// Encodes `message` into `out`, replacing what `out` held. Reusing `out`
/// across messages avoids an allocation per message.
pub fn encode_into(message: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    message.validate()?;
    match message {
        Message::Transfer(transfer) if !transfer.metadata.is_empty() => {
            encode_body(message, Some(transfer.metadata.iter()), out)
        }
        _ => encode_body(message, NO_METADATA, out),
    }
}

/// No metadata: the message is written at minor 0.
const NO_METADATA: Option<std::iter::Empty<(&str, &[u8])>> = None;

/// Encodes a `Transfer` of `id` with `segments` and `metadata` borrowed
/// from the caller into `out`: the bytes of [`encode_into`] of the same
/// `Message::Transfer`, without building that message (no copy of a name
/// or a value but the one into `out`). A sender encodes every message this
/// way.
pub fn encode_transfer_into<'s, 'm, I, M>(
    id: u64,
    segments: I,
    metadata: M,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError>
where
    I: ExactSizeIterator<Item = &'s Segment> + Clone,
    M: ExactSizeIterator<Item = (&'m str, &'m [u8])> + Clone,
{
    crate::message::validate_transfer(id, segments.clone(), metadata.clone())?;
    let metadata = (metadata.len() > 0).then_some(metadata);
    encode_body(&BorrowedTransfer { id, segments }, metadata, out)
}

/// Serializes exactly as `Message::Transfer(Transfer { id, segments })`
/// does: variant 0, then the struct's fields in order, the list as a length
/// and its elements.
struct BorrowedTransfer<I> {
    id: u64,
    segments: I,
}

impl<'s, I> serde::Serialize for BorrowedTransfer<I>
where
    I: ExactSizeIterator<Item = &'s Segment> + Clone,
{
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_newtype_variant("Message", 0, "Transfer", &TransferFields(self))
    }
}

struct TransferFields<'t, I>(&'t BorrowedTransfer<I>);

impl<'s, I> serde::Serialize for TransferFields<'_, I>
where
    I: ExactSizeIterator<Item = &'s Segment> + Clone,
{
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut fields = serializer.serialize_struct("Transfer", 2)?;
        fields.serialize_field("id", &self.0.id)?;
        fields.serialize_field("segments", &SegmentList(self.0.segments.clone()))?;
        fields.end()
    }
}

struct SegmentList<I>(I);

impl<'s, I> serde::Serialize for SegmentList<I>
where
    I: ExactSizeIterator<Item = &'s Segment> + Clone,
{
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.clone())
    }
}

/// Writes the preamble and the body of an already validated message (its
/// 1.0 fields, then a transfer's `metadata` if it has any, at minor 1), then
/// patches in the body's length.
fn encode_body<'m>(
    body: &impl serde::Serialize,
    metadata: Option<impl ExactSizeIterator<Item = (&'m str, &'m [u8])>>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let minor = if metadata.is_some() {
        METADATA_MINOR
    } else {
        0
    };
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.major.to_le_bytes());
    out.extend_from_slice(&minor.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // body_len, patched below
    // The pinned bincode's own error type stays behind this module.
    bincode::serde::encode_into_std_write(body, out, body_config()).map_err(|error| {
        EncodeError::Encoder {
            detail: error.to_string(),
        }
    })?;
    if let Some(metadata) = metadata {
        crate::metadata::encode_into(metadata, out);
    }
    let body_len = out.len() - PREAMBLE_LEN;
    if body_len > MAX_BODY_LEN {
        return Err(EncodeError::TooLarge);
    }
    let body_len = u32::try_from(body_len).map_err(|_| EncodeError::TooLarge)?;
    if let Some(field) = out.get_mut(8..PREAMBLE_LEN) {
        field.copy_from_slice(&body_len.to_le_bytes());
    }
    Ok(())
}

/// Encodes `message` into a new buffer.
pub fn encode(message: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(message, &mut out)?;
    Ok(out)
}

/// A checked cursor over untrusted bytes: every read says how much it needs
/// and fails rather than reading past the end.
#[derive(Debug)]
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.rest.split_first_chunk::<N>()?;
        self.rest = rest;
        Some(*head)
    }

    fn u16_le(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }

    fn u32_le(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    fn rest(self) -> &'a [u8] {
        self.rest
    }
}

/// Decodes one whole message (everything one `recvmsg` returned), checking in
/// this order: preamble length, magic, major version, declared body length
/// against the limit, declared against actual length, body, field rules.
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let short = || DecodeError::ShortPreamble { len: bytes.len() };
    let mut reader = Reader::new(bytes);
    let magic = reader.take::<4>().ok_or_else(short)?;
    let major = reader.u16_le().ok_or_else(short)?;
    let minor = reader.u16_le().ok_or_else(short)?;
    let declared = reader.u32_le().ok_or_else(short)?;
    let body = reader.rest();

    if magic != MAGIC {
        return Err(DecodeError::BadMagic { found: magic });
    }
    let version = Version { major, minor };
    if major != VERSION.major {
        return Err(DecodeError::UnsupportedVersion { found: version });
    }
    if declared as usize > MAX_BODY_LEN {
        return Err(DecodeError::BodyTooLarge { declared });
    }
    if body.len() < declared as usize {
        return Err(DecodeError::TruncatedBody {
            declared,
            actual: body.len(),
        });
    }
    if body.len() > declared as usize {
        return Err(DecodeError::TrailingBytes {
            declared,
            actual: body.len(),
        });
    }

    let (mut message, mut used): (Message, usize) =
        bincode::serde::decode_from_slice(body, body_config()).map_err(|error| {
            DecodeError::Body {
                detail: error.to_string(),
            }
        })?;
    // Minor 1 appended a transfer's metadata to the 1.0 body.
    if let Message::Transfer(transfer) = &mut message {
        if minor >= METADATA_MINOR {
            let (metadata, taken) = crate::metadata::decode(body.get(used..).unwrap_or_default())
                .map_err(|error| DecodeError::Body {
                detail: error.to_string(),
            })?;
            transfer.metadata = metadata;
            used += taken;
        }
    }
    let extra = body.len().saturating_sub(used);
    // Only a newer minor may append fields this version does not know.
    let peer_is_newer = minor > VERSION.minor;
    if extra > 0 && !peer_is_newer {
        return Err(DecodeError::TrailingBodyBytes { extra, version });
    }
    message.validate().map_err(|error| DecodeError::Field {
        id: message.id(),
        error,
    })?;
    Ok(Decoded { version, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Ack, Reject, Segment, Transfer};
    use crate::seals::Seals;

    fn transfer() -> Message {
        Message::Transfer(Transfer {
            id: 7,
            segments: vec![
                Segment {
                    name: "shma".into(),
                    size: 4 << 20,
                    seals: Seals::SENDER_DEFAULT,
                },
                Segment {
                    name: "shmb".into(),
                    size: 0,
                    seals: Seals::WRITE,
                },
            ],
            metadata: crate::Metadata::new(),
        })
    }

    fn with_preamble(major: u16, minor: u16, body: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&major.to_le_bytes());
        out.extend_from_slice(&minor.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    fn body_of(message: &Message) -> Vec<u8> {
        encode(message).unwrap()[PREAMBLE_LEN..].to_vec()
    }

    #[test]
    fn round_trip() {
        for message in [
            transfer(),
            Message::Ack(Ack { id: 7 }),
            Message::Reject(Reject::new(7, RejectReason::MissingSeals, "no WRITE")),
            Message::Reject(Reject::new(0, RejectReason::Unknown(4242), "")),
        ] {
            let bytes = encode(&message).unwrap();
            let decoded = decode(&bytes).unwrap();
            assert_eq!(decoded.message, message);
            // Without metadata, every message is written as 1.0 writes it.
            assert_eq!(decoded.version, Version { major: 1, minor: 0 });
        }
        let Message::Transfer(plain) = transfer() else {
            unreachable!()
        };
        let with_metadata = Message::Transfer(
            plain.with_metadata(
                crate::Metadata::new()
                    .with("frame", "42")
                    .with("raw", [0u8, 255]),
            ),
        );
        let decoded = decode(&encode(&with_metadata).unwrap()).unwrap();
        assert_eq!(decoded.message, with_metadata);
        assert_eq!(decoded.version, VERSION, "metadata is written at minor 1");
    }

    fn check_decode(input: &[u8], expected: DecodeError) {
        assert_eq!(decode(input), Err(expected), "input {input:02x?}");
    }

    #[test]
    fn decode_error_table() {
        let good = encode(&transfer()).unwrap();
        let body = body_of(&transfer());

        check_decode(&[], DecodeError::ShortPreamble { len: 0 });
        check_decode(&good[..11], DecodeError::ShortPreamble { len: 11 });

        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        check_decode(&bad_magic, DecodeError::BadMagic { found: *b"XLPS" });

        check_decode(
            &with_preamble(2, 0, &body),
            DecodeError::UnsupportedVersion {
                found: Version { major: 2, minor: 0 },
            },
        );
        check_decode(
            &with_preamble(0, 9, &body),
            DecodeError::UnsupportedVersion {
                found: Version { major: 0, minor: 9 },
            },
        );

        let mut over_limit = with_preamble(1, 0, &[]);
        over_limit[8..12].copy_from_slice(&(MAX_BODY_LEN as u32 + 1).to_le_bytes());
        check_decode(
            &over_limit,
            DecodeError::BodyTooLarge {
                declared: MAX_BODY_LEN as u32 + 1,
            },
        );

        check_decode(
            &good[..good.len() - 1],
            DecodeError::TruncatedBody {
                declared: body.len() as u32,
                actual: body.len() - 1,
            },
        );
        let mut longer = good.clone();
        longer.push(0);
        check_decode(
            &longer,
            DecodeError::TrailingBytes {
                declared: body.len() as u32,
                actual: body.len() + 1,
            },
        );

        let mut same_minor_extra = body.clone();
        same_minor_extra.extend_from_slice(&[1, 2, 3]);
        check_decode(
            &with_preamble(1, 0, &same_minor_extra),
            DecodeError::TrailingBodyBytes {
                extra: 3,
                version: Version { major: 1, minor: 0 },
            },
        );
        // At minor 1 a transfer's metadata follows its segments: bytes that
        // are not a metadata list are malformed, and bytes after it trail.
        let mut empty_metadata_extra = body.clone();
        empty_metadata_extra.extend_from_slice(&0u64.to_le_bytes());
        empty_metadata_extra.extend_from_slice(&[1, 2, 3]);
        check_decode(
            &with_preamble(1, 1, &empty_metadata_extra),
            DecodeError::TrailingBodyBytes {
                extra: 3,
                version: VERSION,
            },
        );
        let mut endless_metadata = body.clone();
        endless_metadata.extend_from_slice(&u64::MAX.to_le_bytes());
        check_decode(
            &with_preamble(1, 1, &endless_metadata),
            DecodeError::Body {
                detail: "the metadata list declares 18446744073709551615 entries; the 0 bytes \
                         after its count hold at most 0"
                    .into(),
            },
        );

        let mut zero_id = Vec::new();
        zero_id.extend_from_slice(&0u32.to_le_bytes()); // Transfer
        zero_id.extend_from_slice(&0u64.to_le_bytes()); // id
        zero_id.extend_from_slice(&0u64.to_le_bytes()); // no segments
        check_decode(
            &with_preamble(1, 0, &zero_id),
            DecodeError::Field {
                id: 0,
                error: FieldError::ZeroTransferId,
            },
        );
    }

    /// Once the body decodes, a field rule broken keeps the message's id,
    /// so the receiver's `Reject` can repeat it.
    #[test]
    fn field_errors_keep_the_decoded_id() {
        let check = |segments: Vec<Segment>, reason: RejectReason| {
            let mut body = 0u32.to_le_bytes().to_vec(); // Transfer
            body.extend_from_slice(&77u64.to_le_bytes());
            body.extend_from_slice(&(segments.len() as u64).to_le_bytes());
            for segment in &segments {
                body.extend_from_slice(&(segment.name.len() as u64).to_le_bytes());
                body.extend_from_slice(segment.name.as_bytes());
                body.extend_from_slice(&segment.size.to_le_bytes());
                body.extend_from_slice(&segment.seals.bits().to_le_bytes());
            }
            let error = decode(&with_preamble(1, 0, &body)).unwrap_err();
            assert_eq!(error.reject_id(), 77, "{error}");
            assert_eq!(error.reject_reason(), reason, "{error}");
        };
        let named = |name: &str| Segment {
            name: name.into(),
            size: 1,
            seals: Seals::empty(),
        };
        check(vec![], RejectReason::InvalidField);
        check(vec![named("dup"), named("dup")], RejectReason::InvalidField);
        check(vec![named("a\0b")], RejectReason::InvalidField);
        check(vec![named(&"n".repeat(250))], RejectReason::InvalidField);
        check(vec![named("s"); 1000], RejectReason::TooManySegments);
        // Before the body decodes there is no id to repeat.
        assert_eq!(decode(b"SLPS").unwrap_err().reject_id(), 0);
    }

    #[test]
    fn unknown_variant_and_bad_utf8_are_malformed() {
        let mut unknown = 3u32.to_le_bytes().to_vec();
        unknown.extend_from_slice(&1u64.to_le_bytes());
        let error = decode(&with_preamble(1, 0, &unknown)).unwrap_err();
        assert_eq!(error.reject_reason(), RejectReason::Malformed, "{error}");

        let mut bad_name = body_of(&transfer());
        // name bytes of segment 0 start after tag(4) id(8) count(8) len(8)
        bad_name[28] = 0xff;
        let error = decode(&with_preamble(1, 0, &bad_name)).unwrap_err();
        assert_eq!(error.reject_reason(), RejectReason::Malformed, "{error}");
    }

    #[test]
    fn huge_declared_counts_fail_without_allocating() {
        let mut body = 0u32.to_le_bytes().to_vec();
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&u64::MAX.to_le_bytes()); // segment count
        let error = decode(&with_preamble(1, 0, &body)).unwrap_err();
        assert!(matches!(error, DecodeError::Body { .. }), "{error}");
    }

    #[test]
    fn newer_minor_may_append_fields() {
        // A 1.3 transfer: the 1.0 body, 1.1's metadata (none), then fields
        // this version does not know.
        let mut body = body_of(&transfer());
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(b"future field");
        let decoded = decode(&with_preamble(1, 3, &body)).unwrap();
        assert_eq!(decoded.message, transfer());
        assert_eq!(decoded.version, Version { major: 1, minor: 3 });
        // A 1.3 Ack: 1.1 appended nothing to it.
        let mut ack = body_of(&Message::Ack(Ack { id: 7 }));
        ack.extend_from_slice(b"future field");
        assert_eq!(
            decode(&with_preamble(1, 3, &ack)).unwrap().message,
            Message::Ack(Ack { id: 7 })
        );
    }

    #[test]
    fn encode_refuses_invalid_fields() {
        let message = Message::Transfer(Transfer::new(0, vec![]));
        assert!(matches!(
            encode(&message),
            Err(EncodeError::Field(FieldError::ZeroTransferId))
        ));
        let twice = Segment {
            name: "dup".into(),
            size: 1,
            seals: Seals::empty(),
        };
        for segments in [vec![], vec![twice.clone(), twice]] {
            let message = Message::Transfer(Transfer::new(1, segments));
            assert!(matches!(encode(&message), Err(EncodeError::Field(_))));
        }
    }
}

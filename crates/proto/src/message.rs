//! The messages of protocol v1 and the rules on their fields.
//!
//! These types are the body of a message; [`crate::codec`] frames and encodes
//! them. Field order is wire order: a newer minor version may only append
//! fields after the last field of the message body (see PROTOCOL.md).
#![forbid(unsafe_code)]

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::{
    MAX_METADATA_KEY_LEN, MAX_METADATA_LEN, MAX_NAME_LEN, MAX_REJECT_MESSAGE_LEN, MAX_SEGMENTS,
};
use crate::metadata::{Metadata, validate_metadata};
use crate::seals::Seals;

/// One protocol message. On the wire the variant is a `u32` tag: 0, 1, 2.
/// New kinds may come in later minor versions (PROTOCOL.md section 8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Message {
    /// Sender to receiver: the fds of this `sendmsg` are these segments, in order.
    Transfer(Transfer),
    /// Receiver to sender: every segment of transfer `id` was verified and consumed.
    Ack(Ack),
    /// Receiver to sender: transfer `id` was refused; its fds were closed.
    Reject(Reject),
}

/// A message carrying one memfd per segment, and (protocol 1.1) the
/// application's own fields. Build one with [`Transfer::new`]: newer minor
/// versions may append fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Transfer {
    /// Chosen by the sender, unique on its connection, never 0.
    pub id: u64,
    /// One per fd of the message, in the order of the fds. None at all is
    /// allowed (1.1) when there is metadata.
    pub segments: Vec<Segment>,
    /// Appended at minor 1, after the 1.0 body: the codec writes and reads
    /// it by hand, so the derived (1.0) encoding skips it.
    #[serde(skip)]
    pub metadata: Metadata,
}

/// What a sender declares about one memfd. The receiver checks every field
/// against what the kernel reports. Build one with [`Segment::new`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Segment {
    /// The name given to `memfd_create`: UTF-8, at most [`MAX_NAME_LEN`] bytes, no NUL.
    pub name: String,
    /// The file's size in bytes.
    pub size: u64,
    /// Seals the memfd carries at least.
    pub seals: Seals,
}

impl Transfer {
    /// A transfer of `segments`, one per fd, under the sender's `id`.
    pub fn new(id: u64, segments: Vec<Segment>) -> Transfer {
        Transfer {
            id,
            segments,
            metadata: Metadata::new(),
        }
    }

    /// This transfer, carrying `metadata` (protocol 1.1).
    #[must_use]
    pub fn with_metadata(mut self, metadata: Metadata) -> Transfer {
        self.metadata = metadata;
        self
    }
}

impl Ack {
    /// The acknowledgement of transfer `id`.
    pub fn new(id: u64) -> Ack {
        Ack { id }
    }
}

impl Segment {
    /// A declaration of a segment named `name`, of `size` bytes, carrying at
    /// least `seals`.
    pub fn new(name: impl Into<String>, size: u64, seals: Seals) -> Segment {
        Segment {
            name: name.into(),
            size,
            seals,
        }
    }
}

/// The receiver verified and consumed transfer `id`. Build one with
/// [`Ack::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Ack {
    /// The id of the transfer.
    pub id: u64,
}

/// The receiver refused a transfer. Build one with [`Reject::new`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Reject {
    /// The id of the refused transfer, or 0 when the message was too broken
    /// for its id to be read.
    pub id: u64,
    /// Why, as a stable code.
    pub reason: RejectReason,
    /// Why, for a person: what was expected and what was found.
    pub message: String,
}

/// `MissingSeals (transfer 9): segment 0 lacks WRITE`. A `Reject` is also an
/// error value, for code that turns a refusal into one with `?`.
impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (transfer {}): {}",
            self.reason, self.id, self.message
        )
    }
}

impl std::error::Error for Reject {}

impl Reject {
    /// A reject whose message is cut, on a character boundary, to the
    /// protocol's limit.
    pub fn new(id: u64, reason: RejectReason, message: impl Into<String>) -> Reject {
        let mut message = message.into();
        if message.len() > MAX_REJECT_MESSAGE_LEN {
            let mut end = MAX_REJECT_MESSAGE_LEN;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Reject {
            id,
            reason,
            message,
        }
    }
}

macro_rules! reject_reasons {
    ($($(#[doc = $doc:literal])* $name:ident = $code:literal,)*) => {
        /// Why a receiver refused a transfer. On the wire a `u16` code; codes
        /// are never reused. A code this version does not know decodes as
        /// [`RejectReason::Unknown`], so a newer receiver's reasons still reach
        /// an older sender. Reasons compare by code: `Unknown(15)` is
        /// `MissingSeals`.
        #[derive(Debug, Clone, Copy)]
        #[non_exhaustive]
        pub enum RejectReason {
            $($(#[doc = $doc])* $name,)*
            /// A code this version does not know.
            Unknown(u16),
        }

        impl RejectReason {
            /// Every reason this version knows, in code order.
            pub const ALL: &'static [RejectReason] = &[$(RejectReason::$name,)*];

            /// The wire code.
            pub fn code(self) -> u16 {
                match self {
                    $(RejectReason::$name => $code,)*
                    RejectReason::Unknown(code) => code,
                }
            }

            /// The reason for a wire code.
            pub fn from_code(code: u16) -> RejectReason {
                match code {
                    $($code => RejectReason::$name,)*
                    other => RejectReason::Unknown(other),
                }
            }

            /// The reason's name as PROTOCOL.md spells it.
            pub fn name(self) -> &'static str {
                match self {
                    $(RejectReason::$name => stringify!($name),)*
                    RejectReason::Unknown(_) => "Unknown",
                }
            }
        }
    };
}

reject_reasons! {
    /// The body could not be decoded as a v1 message.
    Malformed = 1,
    /// The message does not start with the protocol's magic.
    BadMagic = 2,
    /// The major version is not one the receiver speaks.
    UnsupportedVersion = 3,
    /// The message is shorter than its preamble or than the body length it declares.
    Truncated = 4,
    /// The message is longer than the body length it declares.
    TrailingBytes = 5,
    /// The message is over the size limit.
    TooLarge = 6,
    /// The control data was cut (`MSG_CTRUNC`).
    ControlTruncated = 7,
    /// A message other than `Transfer` reached the receiver.
    UnexpectedMessage = 8,
    /// More segments than the limit.
    TooManySegments = 9,
    /// A field breaks a rule of the protocol (a name, an id, a message length).
    InvalidField = 10,
    /// The number of fds differs from the number of segments.
    FdCountMismatch = 11,
    /// An fd is not a memfd.
    NotMemfd = 12,
    /// A memfd's name differs from the declared name.
    NameMismatch = 13,
    /// A memfd's size differs from the declared size.
    SizeMismatch = 14,
    /// A memfd lacks a declared seal or a seal the receiver requires.
    MissingSeals = 15,
    /// A verified memfd could not be mapped.
    MapFailed = 16,
    /// The receiving application refused the transfer.
    ApplicationRejected = 17,
    /// The receiver ran short of a resource (fds, memory) for this transfer.
    ResourceExhausted = 18,
    /// The peer's credentials are not on the receiver's allow list.
    NotAllowed = 19,
    /// The receiver serves as many connections as it allows.
    TooManyConnections = 20,
    /// Mapping the transfer would exceed the receiver's mapped-bytes limit.
    MemoryLimit = 21,
    /// The peer took too long to send its first message, or went idle.
    Timeout = 22,
    /// A memfd has holes (fewer bytes allocated than its size) and the
    /// receiver refuses sparse memfds.
    Sparse = 23,
}

impl PartialEq for RejectReason {
    fn eq(&self, other: &RejectReason) -> bool {
        self.code() == other.code()
    }
}

impl Eq for RejectReason {}

impl std::hash::Hash for RejectReason {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.code().hash(state);
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectReason::Unknown(code) => write!(f, "Unknown({code})"),
            known => f.write_str(known.name()),
        }
    }
}

impl Serialize for RejectReason {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.code())
    }
}

impl<'de> Deserialize<'de> for RejectReason {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        u16::deserialize(deserializer).map(RejectReason::from_code)
    }
}

impl Serialize for Seals {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(self.bits())
    }
}

impl<'de> Deserialize<'de> for Seals {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        u32::deserialize(deserializer).map(Seals::from_bits_retain)
    }
}

/// A field that breaks a rule of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FieldError {
    /// A transfer's id is 0, which is reserved for "unknown".
    #[error("transfer id is 0; expected a nonzero id (0 is reserved)")]
    ZeroTransferId,
    /// Too many segments.
    #[error("{count} segments; expected at most {MAX_SEGMENTS}")]
    TooManySegments {
        /// How many the message has.
        count: usize,
    },
    /// A segment name is too long.
    #[error("segment {index}: name of {len} bytes; expected at most {MAX_NAME_LEN}")]
    NameTooLong {
        /// The segment's position.
        index: usize,
        /// The name's length in bytes.
        len: usize,
    },
    /// A segment name holds a NUL byte, which no memfd name can.
    #[error("segment {index}: name {name:?} holds a NUL byte")]
    NameHasNul {
        /// The segment's position.
        index: usize,
        /// The name.
        name: String,
    },
    /// A transfer with neither segments nor metadata: there is nothing to
    /// hand over.
    #[error("transfer has no segments and no metadata; expected at least one of either")]
    NoSegments,
    /// A metadata key is empty.
    #[error("metadata entry {index}: empty key; expected 1 to {MAX_METADATA_KEY_LEN} bytes")]
    EmptyMetadataKey {
        /// The entry's position.
        index: usize,
    },
    /// A metadata key is too long.
    #[error("metadata entry {index}: key of {len} bytes; expected at most {MAX_METADATA_KEY_LEN}")]
    MetadataKeyTooLong {
        /// The entry's position.
        index: usize,
        /// The key's length in bytes.
        len: usize,
    },
    /// A metadata key holds a NUL byte.
    #[error("metadata entry {index}: key {key:?} holds a NUL byte")]
    MetadataKeyHasNul {
        /// The entry's position.
        index: usize,
        /// The key.
        key: String,
    },
    /// Two entries share a key.
    #[error(
        "metadata entry {index}: key {key:?} is already the key of entry {first}; expected keys unique within a transfer"
    )]
    DuplicateMetadataKey {
        /// The earlier entry's position.
        first: usize,
        /// The later entry's position.
        index: usize,
        /// The key they share.
        key: String,
    },
    /// The metadata is over its limit.
    #[error("metadata of {len} bytes encoded; expected at most {MAX_METADATA_LEN}")]
    MetadataTooLarge {
        /// Bytes it takes on the wire.
        len: usize,
    },
    /// Two segments of one transfer share a name.
    #[error(
        "segment {index}: name {name:?} is already the name of segment {first}; expected names unique within a transfer"
    )]
    DuplicateName {
        /// The earlier segment's position.
        first: usize,
        /// The later segment's position.
        index: usize,
        /// The name they share.
        name: String,
    },
    /// A reject message is too long.
    #[error("reject message of {len} bytes; expected at most {MAX_REJECT_MESSAGE_LEN}")]
    RejectMessageTooLong {
        /// Its length in bytes.
        len: usize,
    },
}

impl FieldError {
    /// The reason a receiver gives when a transfer breaks this rule.
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            FieldError::TooManySegments { .. } => RejectReason::TooManySegments,
            _ => RejectReason::InvalidField,
        }
    }
}

/// Checks a segment name against the protocol's rules.
pub fn validate_name(index: usize, name: &str) -> Result<(), FieldError> {
    if name.len() > MAX_NAME_LEN {
        return Err(FieldError::NameTooLong {
            index,
            len: name.len(),
        });
    }
    if name.contains('\0') {
        return Err(FieldError::NameHasNul {
            index,
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// The field rules of a `Transfer` of `id` with `segments` and `metadata`,
/// for callers that hold them without a [`Transfer`] around them, checked
/// in this order: the id is not 0; at most [`MAX_SEGMENTS`] segments, and
/// at least one segment or one metadata entry; each name within
/// [`MAX_NAME_LEN`] bytes and free of NUL; no two names alike; then the
/// metadata's rules ([`validate_metadata`]).
pub fn validate_transfer<'s, 'm>(
    id: u64,
    segments: impl ExactSizeIterator<Item = &'s Segment> + Clone,
    metadata: impl ExactSizeIterator<Item = (&'m str, &'m [u8])> + Clone,
) -> Result<(), FieldError> {
    if id == 0 {
        return Err(FieldError::ZeroTransferId);
    }
    let count = segments.len();
    if count > MAX_SEGMENTS {
        return Err(FieldError::TooManySegments { count });
    }
    if count == 0 && metadata.len() == 0 {
        return Err(FieldError::NoSegments);
    }
    for (index, segment) in segments.clone().enumerate() {
        validate_name(index, &segment.name)?;
    }
    check_unique_names(segments)?;
    validate_metadata(metadata)
}

/// Finds two segments with the same name without allocating: the positions,
/// at most [`MAX_SEGMENTS`] of them, are sorted by name on the stack, so a
/// hostile transfer costs O(n log n) comparisons, not O(n²). Of several
/// repeats, the one whose later segment comes first is reported.
fn check_unique_names<'s>(
    segments: impl ExactSizeIterator<Item = &'s Segment> + Clone,
) -> Result<(), FieldError> {
    let count = segments.len();
    if count < 2 {
        return Ok(());
    }
    let mut names: [&str; MAX_SEGMENTS] = [""; MAX_SEGMENTS];
    let mut order: [u8; MAX_SEGMENTS] = [0; MAX_SEGMENTS];
    for ((slot, position), (index, segment)) in names
        .iter_mut()
        .zip(order.iter_mut())
        .zip(segments.enumerate())
    {
        *slot = segment.name.as_str();
        // MAX_SEGMENTS (253) positions fit in a u8.
        *position = u8::try_from(index).unwrap_or(u8::MAX);
    }
    let name_at = |position: u8| names.get(usize::from(position)).copied().unwrap_or("");
    let order = order.get_mut(..count).unwrap_or_default();
    order.sort_unstable_by(|&a, &b| name_at(a).cmp(name_at(b)).then(a.cmp(&b)));
    let repeat = order
        .windows(2)
        .filter_map(|pair| match *pair {
            [a, b] if name_at(a) == name_at(b) => Some((a, b)),
            _ => None,
        })
        .min_by_key(|&(_, later)| later);
    match repeat {
        Some((first, index)) => Err(FieldError::DuplicateName {
            first: usize::from(first),
            index: usize::from(index),
            name: name_at(index).to_owned(),
        }),
        None => Ok(()),
    }
}

impl Message {
    /// Checks every field against the protocol's rules. Both encoding and
    /// decoding call this, so neither side puts a message on the wire that the
    /// other must refuse for its fields.
    pub fn validate(&self) -> Result<(), FieldError> {
        match self {
            Message::Transfer(transfer) => validate_transfer(
                transfer.id,
                transfer.segments.iter(),
                transfer.metadata.iter(),
            ),
            Message::Ack(_) => Ok(()),
            Message::Reject(reject) => {
                if reject.message.len() > MAX_REJECT_MESSAGE_LEN {
                    return Err(FieldError::RejectMessageTooLong {
                        len: reject.message.len(),
                    });
                }
                Ok(())
            }
        }
    }

    /// The transfer id this message concerns.
    pub fn id(&self) -> u64 {
        match self {
            Message::Transfer(t) => t.id,
            Message::Ack(a) => a.id,
            Message::Reject(r) => r.id,
        }
    }

    /// The message kind as PROTOCOL.md names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Transfer(_) => "Transfer",
            Message::Ack(_) => "Ack",
            Message::Reject(_) => "Reject",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for &reason in RejectReason::ALL {
            assert!(
                seen.insert(reason.code()),
                "duplicate code {}",
                reason.code()
            );
            assert_eq!(RejectReason::from_code(reason.code()), reason);
        }
        assert_eq!(RejectReason::from_code(999), RejectReason::Unknown(999));
        assert_eq!(RejectReason::Unknown(999).code(), 999);
        // A known code spelled as Unknown is that reason, hash included.
        assert_eq!(RejectReason::Unknown(15), RejectReason::MissingSeals);
        let set: std::collections::HashSet<_> =
            [RejectReason::Unknown(15), RejectReason::MissingSeals].into();
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn reject_message_is_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_REJECT_MESSAGE_LEN);
        let reject = Reject::new(1, RejectReason::Malformed, long);
        assert!(reject.message.len() <= MAX_REJECT_MESSAGE_LEN);
        assert_eq!(reject.message.len(), MAX_REJECT_MESSAGE_LEN);
        assert_eq!(Message::Reject(reject).validate(), Ok(()));
    }

    fn transfer(id: u64, names: &[&str]) -> Message {
        Message::Transfer(Transfer {
            id,
            segments: names
                .iter()
                .map(|name| Segment {
                    name: (*name).to_owned(),
                    size: 1,
                    seals: Seals::empty(),
                })
                .collect(),
            metadata: Metadata::new(),
        })
    }

    fn check_validate(message: Message, expected: Result<(), FieldError>) {
        assert_eq!(message.validate(), expected, "{message:?}");
    }

    #[test]
    fn validate_table() {
        let longest = "n".repeat(MAX_NAME_LEN);
        let too_long = "n".repeat(MAX_NAME_LEN + 1);
        check_validate(transfer(1, &["shma", "", &longest]), Ok(()));
        check_validate(transfer(0, &["shma"]), Err(FieldError::ZeroTransferId));
        check_validate(
            transfer(1, &["ok", &too_long]),
            Err(FieldError::NameTooLong { index: 1, len: 250 }),
        );
        check_validate(
            transfer(1, &["a\0b"]),
            Err(FieldError::NameHasNul {
                index: 0,
                name: "a\0b".into(),
            }),
        );
        check_validate(
            transfer(1, &["s"; MAX_SEGMENTS + 1]),
            Err(FieldError::TooManySegments { count: 254 }),
        );
        let distinct: Vec<String> = (0..MAX_SEGMENTS).map(|i| format!("s{i}")).collect();
        let distinct: Vec<&str> = distinct.iter().map(String::as_str).collect();
        check_validate(transfer(1, &distinct), Ok(()));
        check_validate(transfer(1, &[]), Err(FieldError::NoSegments));
        check_validate(transfer(0, &[]), Err(FieldError::ZeroTransferId));
        check_validate(
            transfer(1, &["dup", "dup"]),
            Err(FieldError::DuplicateName {
                first: 0,
                index: 1,
                name: "dup".into(),
            }),
        );
        // Of several repeats, the earliest second occurrence is named.
        check_validate(
            transfer(1, &["x", "y", "y", "x", "x"]),
            Err(FieldError::DuplicateName {
                first: 1,
                index: 2,
                name: "y".into(),
            }),
        );
        // Names compare byte for byte: case and prefixes differ.
        check_validate(transfer(1, &["a", "A", "a ", "", "ab"]), Ok(()));
        check_validate(
            transfer(1, &["", "a", ""]),
            Err(FieldError::DuplicateName {
                first: 0,
                index: 2,
                name: String::new(),
            }),
        );
        let mut last_repeats_first = distinct.clone();
        last_repeats_first[MAX_SEGMENTS - 1] = "s0";
        check_validate(
            transfer(1, &last_repeats_first),
            Err(FieldError::DuplicateName {
                first: 0,
                index: MAX_SEGMENTS - 1,
                name: "s0".into(),
            }),
        );
        check_validate(
            Message::Reject(Reject {
                id: 0,
                reason: RejectReason::Malformed,
                message: "x".repeat(MAX_REJECT_MESSAGE_LEN + 1),
            }),
            Err(FieldError::RejectMessageTooLong { len: 1025 }),
        );
    }
}

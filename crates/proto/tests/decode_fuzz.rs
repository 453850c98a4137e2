//! Decoding untrusted bytes never panics, and every valid message survives a
//! round trip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use sealpass_proto::limits::{MAX_NAME_LEN, MAX_SEGMENTS};
use sealpass_proto::{
    Ack, MAGIC, Message, Reject, RejectReason, Seals, Segment, Transfer, decode, encode,
};

fn segment() -> impl Strategy<Value = Segment> {
    (
        "[a-zA-Z0-9 é_.-]{0,40}",
        any::<u64>(),
        any::<u32>().prop_map(Seals::from_bits_retain),
    )
        .prop_filter("name within limit", |(name, _, _)| {
            name.len() <= MAX_NAME_LEN
        })
        .prop_map(|(name, size, seals)| Segment::new(name, size, seals))
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (1..u64::MAX, prop::collection::vec(segment(), 1..20)).prop_map(|(id, segments)| {
            // A valid transfer's names are unique: keep the first of each.
            let mut seen = std::collections::HashSet::new();
            let segments = segments
                .into_iter()
                .filter(|segment| seen.insert(segment.name.clone()))
                .collect();
            Message::Transfer(Transfer::new(id, segments))
        }),
        any::<u64>().prop_map(|id| Message::Ack(Ack::new(id))),
        (any::<u64>(), any::<u16>(), ".{0,80}").prop_map(|(id, code, text)| {
            Message::Reject(Reject::new(id, RejectReason::from_code(code), text))
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_preamble_never_panic(
        minor in any::<u16>(),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&minor.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&body);
        if let Ok(decoded) = decode(&bytes) {
            // Whatever decodes also obeys the field rules.
            prop_assert!(decoded.message.validate().is_ok());
        }
    }

    #[test]
    fn mutated_valid_messages_never_panic(
        message in message(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = encode(&message).unwrap();
        for (index, value) in flips {
            let i = index.index(bytes.len());
            bytes[i] = value;
        }
        let _ = decode(&bytes);
    }

    #[test]
    fn round_trip(message in message()) {
        let bytes = encode(&message).unwrap();
        prop_assert_eq!(decode(&bytes).unwrap().message, message);
    }

    #[test]
    fn borrowed_transfer_encoding_equals_the_owned_one(
        id in any::<u64>(),
        segments in prop::collection::vec(segment(), 0..8),
        entries in prop::collection::vec(("[a-z\\x00]{0,3}", prop::collection::vec(any::<u8>(), 0..16)), 0..4),
    ) {
        // Built entry by entry, so a repeated key stays repeated (and is refused).
        let pairs: Vec<(&str, &[u8])> =
            entries.iter().map(|(key, value)| (key.as_str(), value.as_slice())).collect();
        let mut transfer = Transfer::new(id, segments.clone());
        transfer.metadata = pairs.iter().copied().collect();
        let repeated = transfer.metadata.len() != pairs.len();
        let owned = encode(&Message::Transfer(transfer));
        let mut borrowed = Vec::new();
        let result = sealpass_proto::codec::encode_transfer_into(
            id,
            segments.iter(),
            pairs.iter().copied(),
            &mut borrowed,
        );
        if repeated {
            prop_assert!(result.is_err(), "a repeated key is refused");
            return Ok(());
        }
        match owned {
            Ok(owned) => {
                prop_assert!(result.is_ok());
                prop_assert_eq!(borrowed, owned);
            }
            // Same rules: id 0 (and bad names) fail both ways, with the same error.
            Err(error) => prop_assert_eq!(result.unwrap_err().to_string(), error.to_string()),
        }
    }
}

#[test]
fn the_largest_transfer_encodes_and_decodes() {
    // The longest names, each unique: 246 'x' and three digits.
    let message = Message::Transfer(Transfer::new(
        u64::MAX,
        (0..MAX_SEGMENTS)
            .map(|i| {
                Segment::new(
                    format!("{}{i:03}", "x".repeat(MAX_NAME_LEN - 3)),
                    u64::MAX,
                    Seals::all(),
                )
            })
            .collect(),
    ));
    let bytes = encode(&message).unwrap();
    assert_eq!(bytes.len(), 12 + 68_077);
    assert_eq!(decode(&bytes).unwrap().message, message);
}

//! The wire format, pinned: one message of each kind, byte for byte. A change
//! to the encoding fails here. To change the format on purpose, run with
//! `SEALPASS_BLESS=1`, then update PROTOCOL.md and the version.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use sealpass_proto::{
    Ack, Message, Metadata, Reject, RejectReason, Seals, Segment, Transfer, decode, encode,
};

/// The golden messages; PROTOCOL.md shows the same bytes.
fn golden_messages() -> Vec<(&'static str, Message)> {
    vec![
        (
            "transfer",
            Message::Transfer(Transfer::new(
                1,
                vec![
                    Segment::new("shma", 0x40_0000, Seals::SENDER_DEFAULT),
                    Segment::new("shmb", 0x40_0000, Seals::SENDER_DEFAULT | Seals::EXEC),
                ],
            )),
        ),
        (
            "transfer-with-metadata",
            Message::Transfer(
                Transfer::new(
                    2,
                    vec![Segment::new("frame", 0x1000, Seals::SENDER_DEFAULT)],
                )
                .with_metadata(
                    Metadata::new()
                        .with("seq", "42")
                        .with("raw", [0xffu8, 0x00]),
                ),
            ),
        ),
        (
            "metadata-alone",
            Message::Transfer(
                Transfer::new(3, vec![]).with_metadata(Metadata::new().with("command", "flush")),
            ),
        ),
        ("ack", Message::Ack(Ack::new(1))),
        (
            "reject",
            Message::Reject(Reject::new(
                1,
                RejectReason::MissingSeals,
                "segment 0 lacks WRITE",
            )),
        ),
    ]
}

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.bin"))
}

#[test]
fn encoding_matches_the_golden_bytes() {
    let bless = std::env::var_os("SEALPASS_BLESS").is_some();
    for (name, message) in golden_messages() {
        let bytes = encode(&message).unwrap();
        let path = golden_path(name);
        if bless {
            std::fs::write(&path, &bytes).unwrap();
        }
        let golden = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (SEALPASS_BLESS=1 writes it)", path.display()));
        assert_eq!(
            bytes, golden,
            "encoding of {name} changed; if on purpose, bless and update PROTOCOL.md"
        );
        assert_eq!(decode(&golden).unwrap().message, message, "{name}");
    }
}

/// The sender's borrowed encoder writes the same bytes as the owned one, so
/// the golden file pins both.
#[test]
fn borrowed_transfer_encoding_matches_the_golden_bytes() {
    let (_, Message::Transfer(transfer)) = &golden_messages()[0] else {
        panic!("the first golden message is a Transfer");
    };
    let mut bytes = Vec::new();
    sealpass_proto::codec::encode_transfer_into(
        transfer.id,
        transfer.segments.iter(),
        transfer.metadata.iter(),
        &mut bytes,
    )
    .unwrap();
    assert_eq!(bytes, std::fs::read(golden_path("transfer")).unwrap());
}

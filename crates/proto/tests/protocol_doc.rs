//! PROTOCOL.md's example dumps are the golden vectors, byte for byte.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;

use sealpass_proto::RejectReason;

fn protocol_md() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../PROTOCOL.md");
    std::fs::read_to_string(path).unwrap()
}

/// The bytes of each ```` ```hex NAME ```` block: on each line, the leading
/// two-digit hex tokens; the rest of the line describes them.
fn hex_blocks(doc: &str) -> Vec<(String, Vec<u8>)> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, Vec<u8>)> = None;
    for line in doc.lines() {
        if let Some(name) = line.strip_prefix("```hex ") {
            current = Some((name.trim().to_owned(), Vec::new()));
        } else if line.starts_with("```") {
            blocks.extend(current.take());
        } else if let Some((_, bytes)) = current.as_mut() {
            for token in line.split_whitespace() {
                match u8::from_str_radix(token, 16) {
                    Ok(byte) if token.len() == 2 => bytes.push(byte),
                    _ => break,
                }
            }
        }
    }
    blocks
}

#[test]
fn the_examples_are_the_golden_vectors() {
    let blocks = hex_blocks(&protocol_md());
    let names: Vec<_> = blocks.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "transfer",
            "ack",
            "transfer-with-metadata",
            "metadata-alone",
            "reject"
        ]
    );
    for (name, bytes) in blocks {
        let golden_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/{name}.bin"));
        let golden = std::fs::read(golden_path).unwrap();
        assert_eq!(
            bytes, golden,
            "PROTOCOL.md's {name} example differs from tests/golden/{name}.bin"
        );
    }
}

#[test]
fn every_reject_reason_is_in_the_table() {
    let doc = protocol_md();
    for reason in RejectReason::ALL {
        let row = format!("| {:<4} | `{}`", reason.code(), reason.name());
        assert!(doc.contains(&row), "PROTOCOL.md lacks the row {row:?}");
    }
}

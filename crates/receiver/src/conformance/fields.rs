//! Section 4 (the body) and section 6, steps 5 and 6 (field rules).
#![allow(unused_imports)]
use std::path::Path;

use sealpass_kernel::fdpass;
use sealpass_proto::limits::{MAX_BODY_LEN, MAX_MESSAGE_LEN, MAX_NAME_LEN, MAX_SEGMENTS};
use sealpass_proto::{Ack, Message, RejectReason as R, Seals, encode};

use super::fixtures::*;
use super::*;

/// Bodies that do not decode: trailing bytes, unknown kinds, bad UTF-8, counts past the end.
pub(crate) fn body_cases() -> Vec<Case> {
    let entries: Vec<(String, Script)> = vec![
        (
            "malformed/trailing-bytes-same-minor".into(),
            hostile_header(
                || {
                    let mut body = body_of_one_segment()?;
                    body.push(0);
                    Ok(framed_exact(1, 0, &body))
                },
                0,
                &[R::Malformed],
            ),
        ),
        (
            "malformed/unknown-message-kind".into(),
            hostile_header(
                || {
                    let mut body = 7u32.to_le_bytes().to_vec();
                    body.extend_from_slice(&9u64.to_le_bytes());
                    Ok(framed_exact(1, 0, &body))
                },
                0,
                &[R::Malformed],
            ),
        ),
        (
            "malformed/name-not-utf8".into(),
            hostile_header(
                || {
                    Ok(framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &[b"se\xff"], 4096, SEALED),
                    ))
                },
                0,
                &[R::Malformed],
            ),
        ),
        (
            "malformed/segment-count-past-the-body".into(),
            hostile_header(
                || {
                    let mut body = raw_transfer_body(HOSTILE_ID, &[], 0, SEALED);
                    body.truncate(12);
                    body.extend_from_slice(&u64::MAX.to_le_bytes());
                    Ok(framed_exact(1, 0, &body))
                },
                0,
                &[R::Malformed],
            ),
        ),
    ];
    entries
        .into_iter()
        .map(|(name, script)| Case { name, script })
        .collect()
}

/// Field rules: id 0, names, segment counts, duplicates, messages that are not transfers.
pub(crate) fn cases() -> Vec<Case> {
    let entries: Vec<(String, Script)> = vec![
        (
            "malformed/transfer-id-zero".into(),
            hostile_header(
                || {
                    Ok(framed_exact(
                        1,
                        0,
                        &raw_transfer_body(0, &[b"seg"], 4096, SEALED),
                    ))
                },
                0,
                &[R::InvalidField],
            ),
        ),
        (
            "malformed/name-too-long".into(),
            hostile_header(
                || {
                    let name = vec![b'n'; MAX_NAME_LEN + 1];
                    Ok(framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &[&name], 4096, SEALED),
                    ))
                },
                HOSTILE_ID,
                &[R::InvalidField],
            ),
        ),
        (
            "malformed/name-with-nul".into(),
            hostile_header(
                || {
                    Ok(framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &[b"se\0g"], 4096, SEALED),
                    ))
                },
                HOSTILE_ID,
                &[R::InvalidField],
            ),
        ),
        (
            "malformed/too-many-segments".into(),
            hostile_header(
                || {
                    let names = vec![&b"seg"[..]; MAX_SEGMENTS + 1];
                    Ok(framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &names, 4096, SEALED),
                    ))
                },
                HOSTILE_ID,
                &[R::TooManySegments],
            ),
        ),
        (
            "malformed/a-thousand-segments".into(),
            hostile_header(
                || {
                    let names: Vec<Vec<u8>> =
                        (0..1000).map(|i| format!("seg-{i}").into_bytes()).collect();
                    let names: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
                    Ok(framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &names, 4096, SEALED),
                    ))
                },
                HOSTILE_ID,
                &[R::TooManySegments],
            ),
        ),
        (
            // PROTOCOL.md section 6, step 5: a transfer hands over something.
            "malformed/no-segments".into(),
            probe(|| {
                Ok(Probe {
                    payload: framed_exact(1, 0, &raw_transfer_body(HOSTILE_ID, &[], 0, SEALED)),
                    fds: Vec::new(),
                    expect: Expect::Reject(HOSTILE_ID, &[R::InvalidField]),
                })
            }),
        ),
        (
            // Names are unique within a transfer, even when each fd matches.
            "malformed/duplicate-names".into(),
            probe(|| {
                Ok(Probe {
                    payload: framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &[b"dup", b"dup"], 64, SEALED),
                    ),
                    fds: vec![memfd("dup", 64, SEALED)?, memfd("dup", 64, SEALED)?],
                    expect: Expect::Reject(HOSTILE_ID, &[R::InvalidField]),
                })
            }),
        ),
        (
            "malformed/duplicate-names-apart".into(),
            probe(|| {
                Ok(Probe {
                    payload: framed_exact(
                        1,
                        0,
                        &raw_transfer_body(HOSTILE_ID, &[b"a", b"b", b"c", b"b"], 64, SEALED),
                    ),
                    fds: ["a", "b", "c", "b"]
                        .iter()
                        .map(|name| memfd(name, 64, SEALED))
                        .collect::<Fallible<_>>()?,
                    expect: Expect::Reject(HOSTILE_ID, &[R::InvalidField]),
                })
            }),
        ),
        (
            "malformed/ack-sent-to-the-receiver".into(),
            probe(|| {
                Ok(Probe {
                    payload: encode(&Message::Ack(Ack::new(HOSTILE_ID)))
                        .map_err(|e| e.to_string())?,
                    fds: Vec::new(),
                    expect: Expect::Reject(HOSTILE_ID, &[R::UnexpectedMessage]),
                })
            }),
        ),
    ];
    entries
        .into_iter()
        .map(|(name, script)| Case { name, script })
        .collect()
}

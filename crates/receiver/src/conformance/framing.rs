//! Section 3: the preamble and the message's length.
#![allow(unused_imports)]
use std::path::Path;

use sealpass_kernel::fdpass;
use sealpass_proto::limits::{MAX_BODY_LEN, MAX_MESSAGE_LEN, MAX_NAME_LEN, MAX_SEGMENTS};
use sealpass_proto::{Ack, Message, RejectReason as R, Seals, encode};

use super::fixtures::*;
use super::*;

/// Magic, major version, declared and actual lengths, the message limit.
pub(crate) fn cases() -> Vec<Case> {
    let entries: Vec<(String, Script)> = vec![
        (
            "malformed/bad-magic".into(),
            hostile_header(patched(0, b"SLPX"), 0, &[R::BadMagic]),
        ),
        (
            "malformed/unknown-major".into(),
            probe(|| {
                Ok(Probe {
                    payload: framed_exact(2, 0, &body_of_one_segment()?),
                    fds: vec![memfd("seg", 4096, SEALED)?],
                    expect: Expect::RejectAndClose(R::UnsupportedVersion),
                })
            }),
        ),
        (
            "malformed/major-zero".into(),
            probe(|| {
                Ok(Probe {
                    payload: framed_exact(0, 0, &body_of_one_segment()?),
                    fds: vec![memfd("seg", 4096, SEALED)?],
                    expect: Expect::RejectAndClose(R::UnsupportedVersion),
                })
            }),
        ),
        (
            "malformed/truncated-preamble".into(),
            hostile_header(
                || {
                    let mut message = one_segment()?;
                    message.truncate(7);
                    Ok(message)
                },
                0,
                &[R::Truncated],
            ),
        ),
        (
            "malformed/body-length-says-more".into(),
            hostile_header(
                || {
                    let body = body_of_one_segment()?;
                    Ok(framed(1, 0, body.len() as u32 + 1, &body))
                },
                0,
                &[R::Truncated],
            ),
        ),
        (
            "malformed/body-length-says-less".into(),
            hostile_header(
                || {
                    let body = body_of_one_segment()?;
                    Ok(framed(1, 0, body.len() as u32 - 1, &body))
                },
                0,
                &[R::TrailingBytes],
            ),
        ),
        (
            "malformed/body-length-over-limit".into(),
            hostile_header(
                || {
                    Ok(framed(
                        1,
                        0,
                        MAX_BODY_LEN as u32 + 1,
                        &body_of_one_segment()?,
                    ))
                },
                0,
                &[R::TooLarge],
            ),
        ),
        (
            "malformed/message-over-limit".into(),
            hostile_header(
                || {
                    let body = vec![0; MAX_MESSAGE_LEN];
                    Ok(framed_exact(1, 0, &body))
                },
                0,
                &[R::TooLarge],
            ),
        ),
        (
            "malformed/fds-but-no-header".into(),
            hostile_header(|| Ok(Vec::new()), 0, &[R::Truncated]),
        ),
    ];
    entries
        .into_iter()
        .map(|(name, script)| Case { name, script })
        .collect()
}

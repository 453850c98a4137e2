//! Section 2: peers that close, go silent, shut down half the connection or
//! send garbage first.
#![allow(unused_imports)]
use std::path::Path;

use sealpass_kernel::fdpass;
use sealpass_proto::limits::{MAX_BODY_LEN, MAX_MESSAGE_LEN, MAX_NAME_LEN, MAX_SEGMENTS};
use sealpass_proto::{Ack, Message, RejectReason as R, Seals, encode};

use super::fixtures::*;
use super::*;
use std::time::Duration;

/// Transport-level behaviour of peers.
pub(crate) fn cases() -> Vec<Case> {
    let entries: Vec<(String, Script)> = vec![
        (
            "peers/connect-and-close".into(),
            Box::new(|target: &dyn Target| {
                drop(target.connect()?);
                Ok(())
            }),
        ),
        (
            "peers/silent-then-close".into(),
            Box::new(|target: &dyn Target| {
                let connection = target.connect()?;
                std::thread::sleep(Duration::from_millis(200));
                drop(connection);
                Ok(())
            }),
        ),
        (
            "peers/close-before-reading-the-answer".into(),
            Box::new(|target: &dyn Target| {
                let connection = target.connect()?;
                let (payload, fds) = valid_transfer(1, &[("gone", 4096)])?;
                send(&connection, &payload, &fds)
            }),
        ),
        (
            "peers/shut-down-writing-then-read-the-answer".into(),
            Box::new(|target: &dyn Target| {
                let connection = target.connect()?;
                let (payload, fds) = valid_transfer(1, &[("half", 4096)])?;
                send(&connection, &payload, &fds)?;
                nix::sys::socket::shutdown(
                    std::os::fd::AsRawFd::as_raw_fd(&connection),
                    nix::sys::socket::Shutdown::Write,
                )
                .map_err(|e| e.to_string())?;
                check_answer(answer(&connection)?, &Expect::Ack(1))
            }),
        ),
        (
            "peers/garbage-then-valid-on-one-connection".into(),
            Box::new(|target: &dyn Target| {
                let connection = target.connect()?;
                send(&connection, b"garbage, not a message", &[])?;
                check_answer(
                    answer(&connection)?,
                    &Expect::Reject(0, &[R::Truncated, R::BadMagic]),
                )?;
                let (payload, fds) = valid_transfer(2, &[("after", 10)])?;
                send(&connection, &payload, &fds)?;
                check_answer(answer(&connection)?, &Expect::Ack(2))
            }),
        ),
    ];
    entries
        .into_iter()
        .map(|(name, script)| Case { name, script })
        .collect()
}

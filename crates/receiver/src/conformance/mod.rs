//! Scripted senders against a receiver: every case of PROTOCOL.md sections
//! 2 to 8, as data, shared by `cargo xtask conformance` (any receiver
//! executable) and this crate's hostile-sender tests (`sealpass-recv`).
//! Behind the `conformance` feature: test tooling, not part of the library.
//!
//! Each case runs against a [`Target`], which only has to connect. After
//! each, a runner checks that the receiver still serves and holds no more
//! fds than before (see `xtask/src/conformance/receiver.rs`).
#![allow(missing_docs)]
#![allow(clippy::indexing_slicing)]

mod fds;
mod fields;
pub mod fixtures;
mod framing;
mod metadata;
mod peers;
mod valid;

use std::os::fd::OwnedFd;
use std::path::Path;

use sealpass_proto::{Message, RejectReason};

use fixtures::{
    Answer, Fallible, SEALED, answer, memfd, segment, send, transfer_bytes, valid_transfer,
};

/// A receiver under test: all a case needs is a new connection to it.
pub trait Target {
    /// A new `SOCK_SEQPACKET` connection to the receiver.
    fn connect(&self) -> Fallible<OwnedFd>;
}

/// What a probe must get back.
#[derive(Debug, Clone)]
pub enum Expect {
    Ack(u64),
    /// A reject repeating `id` (0 where PROTOCOL.md section 4.1 says there
    /// is no id to repeat), for one of the reasons.
    Reject(u64, &'static [RejectReason]),
    /// A reject with id 0, then the receiver closes the connection.
    RejectAndClose(RejectReason),
}

/// One scripted message.
#[derive(Debug)]
pub struct Probe {
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    pub expect: Expect,
}

/// A case's script: what it sends, and what it checks.
pub type Script = Box<dyn Fn(&dyn Target) -> Fallible<()>>;

/// A named case, `section/name` (`valid/…`, `malformed/…`, `peers/…`).
pub struct Case {
    pub name: String,
    pub script: Script,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Every case, in order: valid transfers (sections 4, 6.1, 8), framing
/// (section 3), body decoding (section 4), field rules (section 6, steps 5
/// and 6), metadata (section 4.3), the fds (steps 7 and 8), memory (steps 9 and 10), then peers
/// that misbehave at the transport level (section 2). `scratch` is a
/// directory for the files some cases pass as fds.
pub fn cases(scratch: &Path) -> Vec<Case> {
    let mut cases = valid::cases();
    cases.extend(framing::cases());
    cases.extend(fields::body_cases());
    cases.extend(fields::cases());
    cases.extend(metadata::cases());
    cases.extend(fds::cases(scratch));
    cases.extend(fds::memory_cases());
    cases.extend(peers::cases());
    cases
}

/// Reasons no scripted sender can provoke from a conforming receiver with
/// fds to spare.
pub const NOT_PROVOKED: &[(RejectReason, &str)] = &[
    (
        RejectReason::ControlTruncated,
        "a receiver with fds to spare has room for every fd the kernel passes",
    ),
    (
        RejectReason::ApplicationRejected,
        "depends on the receiving application",
    ),
];

pub fn check_answer(got: Answer, expect: &Expect) -> Fallible<()> {
    match (got, expect) {
        (Answer::Message(Message::Ack(ack)), Expect::Ack(id)) if ack.id == *id => Ok(()),
        (Answer::Message(Message::Reject(reject)), Expect::Reject(id, reasons))
            if reasons.contains(&reject.reason) && reject.id == *id =>
        {
            Ok(())
        }
        (Answer::Message(Message::Reject(reject)), Expect::RejectAndClose(reason))
            if reject.reason == *reason && reject.id == 0 =>
        {
            Ok(())
        }
        (got, Expect::Ack(id)) => Err(format!("expected Ack({id}); got {}", describe(&got))),
        (got, Expect::Reject(id, reasons)) => Err(format!(
            "expected Reject({}) of transfer {id}; got {}",
            names(reasons),
            describe(&got)
        )),
        (got, Expect::RejectAndClose(reason)) => Err(format!(
            "expected Reject({reason}) of transfer 0; got {}",
            describe(&got)
        )),
    }
}

fn names(reasons: &[RejectReason]) -> String {
    reasons
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" or ")
}

fn describe(answer: &Answer) -> String {
    match answer {
        Answer::Closed => "the connection closed".into(),
        Answer::Message(Message::Reject(reject)) => {
            format!(
                "Reject({} of {}: {})",
                reject.reason, reject.id, reject.message
            )
        }
        Answer::Message(other) => format!("{other:?}"),
    }
}

pub fn run_probe(target: &dyn Target, probe: Probe) -> Fallible<()> {
    let connection = target.connect()?;
    send(&connection, &probe.payload, &probe.fds)?;
    drop(probe.fds);
    check_answer(answer(&connection)?, &probe.expect)?;
    if let Expect::RejectAndClose(_) = probe.expect {
        match answer(&connection)? {
            Answer::Closed => {}
            other => {
                return Err(format!(
                    "expected the connection to close; got {}",
                    describe(&other)
                ));
            }
        }
    }
    Ok(())
}

pub(crate) fn probe(build: impl Fn() -> Fallible<Probe> + 'static) -> Script {
    Box::new(move |target: &dyn Target| run_probe(target, build()?))
}

pub(crate) fn valid(segments: &'static [(&'static str, u64)]) -> Script {
    probe(move || {
        let (payload, fds) = valid_transfer(1, segments)?;
        Ok(Probe {
            payload,
            fds,
            expect: Expect::Ack(1),
        })
    })
}

/// A one-segment transfer of a well-formed memfd, with `payload` in place
/// of its header; the reject must repeat `id` (PROTOCOL.md section 4.1).
pub(crate) fn hostile_header(
    payload: impl Fn() -> Fallible<Vec<u8>> + 'static,
    id: u64,
    expect: &'static [RejectReason],
) -> Script {
    probe(move || {
        Ok(Probe {
            payload: payload()?,
            fds: vec![memfd("seg", 4096, SEALED)?],
            expect: Expect::Reject(id, expect),
        })
    })
}

/// The id of every hostile transfer whose body decodes.
pub(crate) const HOSTILE_ID: u64 = 9;

/// A header declaring `seg`, 4096 bytes, fully sealed, with `fds` beside it.
pub(crate) fn hostile_fds(
    fds: impl Fn() -> Fallible<Vec<OwnedFd>> + 'static,
    expect: &'static [RejectReason],
) -> Script {
    probe(move || {
        Ok(Probe {
            payload: transfer_bytes(HOSTILE_ID, vec![segment("seg", 4096, SEALED)])?,
            fds: fds()?,
            expect: Expect::Reject(HOSTILE_ID, expect),
        })
    })
}

pub(crate) fn one_segment() -> Fallible<Vec<u8>> {
    transfer_bytes(HOSTILE_ID, vec![segment("seg", 4096, SEALED)])
}

pub(crate) fn patched(offset: usize, bytes: &'static [u8]) -> impl Fn() -> Fallible<Vec<u8>> {
    move || {
        let mut message = one_segment()?;
        let end = offset + bytes.len();
        message
            .get_mut(offset..end)
            .ok_or("short message")?
            .copy_from_slice(bytes);
        Ok(message)
    }
}

pub(crate) fn body_of_one_segment() -> Fallible<Vec<u8>> {
    Ok(one_segment()?.split_off(12))
}

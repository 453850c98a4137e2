//! The real `sealpass-recv`, run as its own process, against every scripted
//! sender of the conformance suite (`sealpass_receiver::conformance`: the
//! same cases, fixtures and memfd helper as `cargo xtask conformance`). Each
//! case must get its answer; afterwards the receiver still accepts a valid
//! transfer and its open-fd count is back to what it holds while idle.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::os::fd::{AsFd, OwnedFd};

use sealpass_kernel::fdpass;
use sealpass_proto::{Message, RejectReason};
use sealpass_receiver::conformance::fixtures::{Fallible, SEALED, memfd, segment, transfer_bytes};
use sealpass_receiver::conformance::{self, Target};
use support::{RecvProcess, answer_to, send_valid};

impl Target for RecvProcess {
    fn connect(&self) -> Fallible<OwnedFd> {
        fdpass::connect(self.socket()).map_err(|e| format!("connecting: {e}"))
    }
}

#[test]
fn every_hostile_sender_is_answered_and_the_receiver_keeps_serving() {
    let receiver = RecvProcess::start(&[]);
    let baseline = receiver.idle_fds();
    send_valid(&receiver);
    let cases = conformance::cases(receiver.dir());
    assert!(cases.len() > 60, "the whole suite: {} cases", cases.len());
    for case in cases {
        if let Err(why) = (case.script)(&receiver) {
            panic!("{}: {why}", case.name);
        }
        receiver.wait_for_open_fds(baseline, &case.name);
        send_valid(&receiver);
        receiver.wait_for_open_fds(baseline, &case.name);
    }
}

#[test]
fn silent_and_vanishing_peers_leave_nothing_behind() {
    let receiver = RecvProcess::start(&["--idle-timeout", "1", "--first-message-deadline", "1"]);
    let baseline = receiver.idle_fds();
    send_valid(&receiver);

    // Connects and closes at once.
    drop(fdpass::connect(receiver.socket()).unwrap());
    // Sends a transfer and closes before reading the answer.
    let connection = fdpass::connect(receiver.socket()).unwrap();
    let header = transfer_bytes(1, vec![segment("seg", 4096, SEALED)]).unwrap();
    let fd = memfd("seg", 4096, SEALED).unwrap();
    fdpass::send(connection.as_fd(), &header, &[fd.as_fd()]).unwrap();
    drop(connection);
    receiver.wait_for_open_fds(baseline, "peer gone before the answer");
    // Connects and says nothing: told why, then closed.
    let silent = fdpass::connect(receiver.socket()).unwrap();
    match answer_to(&silent) {
        Some(Message::Reject(reject)) => {
            assert_eq!(reject.reason, RejectReason::Timeout, "{}", reject.message);
            assert_eq!(reject.id, 0);
        }
        other => panic!("a silent peer gets Reject(Timeout); got {other:?}"),
    }
    assert_eq!(answer_to(&silent), None, "then the connection closes");
    receiver.wait_for_open_fds(baseline, "silent peer");
    send_valid(&receiver);
}

//! A sender under test, against a scripted receiver. The sender is started
//! with `--socket PATH` appended, once per scenario. Its message is checked
//! with the kernel, then answered as the scenario says, and its exit status
//! must follow.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sealpass_kernel::fdpass::{self, ControlBuffer};
use sealpass_proto::limits::MAX_MESSAGE_LEN;
use sealpass_proto::verify::{check_fd_count, check_segment};
use sealpass_proto::{Ack, Message, Policy, Reject, RejectReason, Seals, decode, encode};
use sealpass_receiver::inspect;

use super::Report;
use sealpass_receiver::conformance::fixtures::{Fallible, PATIENCE, framed_exact, memfd};

/// How the scripted receiver answers.
#[derive(Clone, Copy)]
enum Answering {
    Ack,
    AckFromNewerMinor,
    AckAfterDelay,
    AckCarryingAnFd,
    Reject(RejectReason),
    /// A `Reject` with id 0 as soon as the sender connects, then a close
    /// without reading: the sender meets `EPIPE` or `ECONNRESET`, and the
    /// reject is still queued for it (PROTOCOL.md section 2).
    RefuseAtConnect(RejectReason),
    CloseWithoutAnswer,
    AckForAnotherId,
}

/// What the sender must do.
#[derive(Clone, Copy)]
enum Outcome {
    /// Exit 0.
    Succeeds,
    /// Exit nonzero.
    Fails,
    /// Exit nonzero, naming the reason (its name, or its code when unknown)
    /// in what it prints.
    Rejected(&'static str),
}

const SCENARIOS: &[(&str, Answering, Outcome)] = &[
    ("ack", Answering::Ack, Outcome::Succeeds),
    (
        "ack-from-a-newer-minor",
        Answering::AckFromNewerMinor,
        Outcome::Succeeds,
    ),
    (
        "ack-after-a-delay",
        Answering::AckAfterDelay,
        Outcome::Succeeds,
    ),
    (
        "ack-carrying-an-fd",
        Answering::AckCarryingAnFd,
        Outcome::Succeeds,
    ),
    (
        "reject",
        Answering::Reject(RejectReason::MissingSeals),
        Outcome::Rejected("MissingSeals"),
    ),
    (
        "reject-with-an-unknown-reason",
        Answering::Reject(RejectReason::Unknown(999)),
        Outcome::Rejected("999"),
    ),
    (
        "refused-at-connect",
        Answering::RefuseAtConnect(RejectReason::TooManyConnections),
        Outcome::Rejected("TooManyConnections"),
    ),
    (
        "refused-at-connect-again",
        Answering::RefuseAtConnect(RejectReason::NotAllowed),
        Outcome::Rejected("NotAllowed"),
    ),
    (
        "refused-at-connect-a-third-time",
        Answering::RefuseAtConnect(RejectReason::Timeout),
        Outcome::Rejected("Timeout"),
    ),
    (
        "receiver-closes-without-answering",
        Answering::CloseWithoutAnswer,
        Outcome::Fails,
    ),
    (
        "ack-for-another-transfer",
        Answering::AckForAnotherId,
        Outcome::Fails,
    ),
];

/// Checks the sender's message as a strict receiver would; returns its id.
fn verify_message(connection: &OwnedFd) -> Fallible<u64> {
    let mut buffer = vec![0; MAX_MESSAGE_LEN];
    let received = fdpass::receive(connection.as_fd(), &mut buffer, &mut ControlBuffer::new())
        .map_err(|e| format!("receiving the sender's message: {e}"))?;
    if received.payload_truncated {
        return Err(format!("message over {MAX_MESSAGE_LEN} bytes"));
    }
    let bytes = buffer.get(..received.len).unwrap_or_default();
    let decoded = decode(bytes).map_err(|e| format!("message does not decode: {e}"))?;
    let Message::Transfer(transfer) = decoded.message else {
        return Err(format!(
            "sent {}; expected Transfer",
            decoded.message.kind()
        ));
    };
    check_fd_count(received.fds.len(), transfer.segments.len()).map_err(|e| e.to_string())?;
    for (index, (declared, fd)) in transfer.segments.iter().zip(&received.fds).enumerate() {
        let facts = inspect::facts(fd.as_fd()).map_err(|e| format!("segment {index}: {e}"))?;
        check_segment(index, declared, &facts, &Policy::new(Seals::empty()))
            .map_err(|e| e.to_string())?;
    }
    Ok(transfer.id)
}

fn answer(connection: &OwnedFd, id: u64, answering: Answering) -> Fallible<()> {
    let encoded = |message: &Message| encode(message).map_err(|e| e.to_string());
    let send = |payload: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]| {
        fdpass::send(connection.as_fd(), payload, fds).map_err(|e| format!("answering: {e}"))
    };
    let ack = Message::Ack(Ack::new(id));
    match answering {
        Answering::Ack => send(&encoded(&ack)?, &[]),
        Answering::AckFromNewerMinor => {
            let mut body = encoded(&ack)?.split_off(12);
            body.extend_from_slice(b"a field from version 1.9");
            send(&framed_exact(1, 9, &body), &[])
        }
        Answering::AckAfterDelay => {
            std::thread::sleep(Duration::from_millis(500));
            send(&encoded(&ack)?, &[])
        }
        Answering::AckCarryingAnFd => {
            let stray = memfd("stray", 1, Seals::empty())?;
            match fdpass::send(connection.as_fd(), &encoded(&ack)?, &[stray.as_fd()]) {
                // The sender had the kernel refuse fds on its socket
                // (SO_PASSRIGHTS off, Linux 6.16+): none can reach it, which
                // is the point. The Ack goes without.
                Err(error) if error.errno() == Some(nix::errno::Errno::EPERM) => {
                    send(&encoded(&ack)?, &[])
                }
                other => other.map_err(|e| format!("answering: {e}")),
            }
        }
        Answering::Reject(reason) => send(
            &encoded(&Message::Reject(Reject::new(
                id,
                reason,
                "scripted refusal",
            )))?,
            &[],
        ),
        Answering::CloseWithoutAnswer => Ok(()),
        Answering::RefuseAtConnect(reason) => send(
            &encoded(&Message::Reject(Reject::new(
                0,
                reason,
                "scripted refusal at connect",
            )))?,
            &[],
        ),
        Answering::AckForAnotherId => send(
            &encoded(&Message::Ack(Ack::new(id.wrapping_add(1000))))?,
            &[],
        ),
    }
}

fn wait(child: &mut Child) -> Fallible<ExitStatus> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the sender was still running after {PATIENCE:?} (hang)"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn scenario(
    command: &[String],
    scratch: &Path,
    index: usize,
    answering: Answering,
    outcome: Outcome,
) -> Fallible<()> {
    let socket = scratch.join(format!("sender-{index}.sock"));
    let listener = fdpass::listen(&socket, 1).map_err(|e| e.to_string())?;
    fdpass::set_timeouts(listener.as_fd(), Some(PATIENCE), None).map_err(|e| e.to_string())?;
    let (program, args) = command.split_first().ok_or("empty sender command")?;
    let log = scratch.join(format!("sender-{index}.log"));
    let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut child = Command::new(program)
        .args(args)
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    let served = fdpass::accept(listener.as_fd())
        .map_err(|e| format!("the sender never connected: {e}"))
        .and_then(|connection| {
            if let Answering::RefuseAtConnect(_) = answering {
                // Before reading anything, as a receiver refusing at accept.
                answer(&connection, 0, answering)?;
                drop(connection);
                return Ok(());
            }
            let id = verify_message(&connection)?;
            answer(&connection, id, answering)?;
            drop(connection);
            Ok(())
        });
    let status = wait(&mut child);
    let _ = std::fs::remove_file(&socket);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let with_log = |e: String| {
        format!(
            "{e}\n    sender output: {}",
            log.trim().replace('\n', "\n    ")
        )
    };
    served.map_err(with_log)?;
    let status = status.map_err(with_log)?;
    match (outcome, status.code()) {
        (Outcome::Succeeds, Some(0)) => Ok(()),
        (Outcome::Fails, Some(code)) if code != 0 => Ok(()),
        (Outcome::Rejected(reason), Some(code)) if code != 0 && log.contains(reason) => Ok(()),
        (Outcome::Succeeds, _) => Err(with_log(format!("expected exit status 0; got {status}"))),
        (Outcome::Fails, _) => Err(with_log(format!(
            "expected a nonzero exit status (not a signal); got {status}"
        ))),
        (Outcome::Rejected(reason), _) => Err(with_log(format!(
            "expected a nonzero exit status and the reason {reason} in the output; got {status}"
        ))),
    }
}

pub(crate) fn check(command: &[String], scratch: &Path, report: &mut Report) {
    for (index, (name, answering, outcome)) in SCENARIOS.iter().enumerate() {
        report.record(
            &format!("sender/{name}"),
            scenario(command, scratch, index, *answering, *outcome),
        );
    }
}

//! A receiver under test, against the scripted senders of
//! `sealpass_receiver::conformance`.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sealpass_proto::fdpass;
use sealpass_receiver::conformance::fixtures::{
    Answer, Fallible, PATIENCE, answer, send, valid_transfer,
};
use sealpass_receiver::conformance::{self, Target};

use super::Report;

/// The receiver process, started with `--socket PATH` appended.
pub(crate) struct Process {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Process {
    pub(crate) fn start(command: &[String], scratch: &Path) -> anyhow::Result<Process> {
        let socket = scratch.join("receiver.sock");
        let log = scratch.join("receiver.log");
        let (program, args) = command
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("empty receiver command"))?;
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(program)
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {program}: {e}"))?;
        let mut target = Process { child, socket, log };
        let deadline = Instant::now() + PATIENCE;
        while fdpass::connect(&target.socket).is_err() {
            if let Some(status) = target.child.try_wait()? {
                anyhow::bail!(
                    "the receiver exited at start ({status}):\n{}",
                    target.log_tail()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the receiver never listened at {}",
                target.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(target)
    }

    fn open_fds(&self) -> Option<usize> {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .ok()
            .map(Iterator::count)
    }

    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = log.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn alive(&mut self) -> Fallible<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("the receiver died ({status})")),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Target for Process {
    fn connect(&self) -> Fallible<OwnedFd> {
        fdpass::connect(&self.socket).map_err(|e| format!("connecting: {e}"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A valid transfer on a new connection is accepted; then this side shuts
/// down writing and reads until the receiver's end of the connection closes.
/// That end of stream is the signal that the receiver has let go of the
/// connection (its socket and anything held with it), no timing involved.
fn served_and_let_go(target: &Process) -> Fallible<()> {
    let connection = target.connect()?;
    let (payload, fds) = valid_transfer(1, &[("still-serving", 4096)])?;
    send(&connection, &payload, &fds)?;
    drop(fds);
    match answer(&connection)? {
        Answer::Message(sealpass_proto::Message::Ack(_)) => {}
        other => return Err(format!("a valid transfer got {other:?}")),
    }
    nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(&connection),
        nix::sys::socket::Shutdown::Write,
    )
    .map_err(|e| e.to_string())?;
    match answer(&connection)? {
        Answer::Closed => Ok(()),
        other => Err(format!(
            "after the peer's end, expected the end; got {other:?}"
        )),
    }
}

/// After a case: the receiver is alive, serves a fresh valid transfer, and
/// its fd count is back at `baseline`.
fn still_serves(target: &mut Process, baseline: Option<usize>) -> Fallible<()> {
    target.alive()?;
    served_and_let_go(target).map_err(|e| format!("afterwards a valid transfer failed: {e}"))?;
    let Some(baseline) = baseline else {
        return Ok(());
    };
    // Connections of the case itself may still be closing: wait for the
    // count, bounded.
    let deadline = Instant::now() + PATIENCE;
    loop {
        match target.open_fds() {
            Some(now) if now == baseline => return Ok(()),
            Some(now) if Instant::now() >= deadline => {
                return Err(format!(
                    "afterwards the receiver holds {now} fds; it held {baseline} before (leak)"
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

pub(crate) fn check(command: &[String], scratch: &Path, report: &mut Report) -> anyhow::Result<()> {
    let mut target = Process::start(command, scratch)?;
    // After a first transfer (some receivers open files lazily), and once
    // the receiver has let go of that connection: the count it returns to.
    served_and_let_go(&target)
        .map_err(|e| anyhow::anyhow!("the receiver does not accept a valid transfer: {e}"))?;
    let baseline = target.open_fds();
    for case in conformance::cases(scratch) {
        let result = (case.script)(&target).and_then(|()| still_serves(&mut target, baseline));
        report.record(
            &format!("receiver/{}", case.name),
            result.map_err(|e| {
                let tail = target.log_tail();
                if tail.is_empty() {
                    e
                } else {
                    format!(
                        "{e}\n    receiver log:\n    {}",
                        tail.replace('\n', "\n    ")
                    )
                }
            }),
        );
    }
    Ok(())
}

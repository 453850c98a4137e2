//! A receiver under test, against the scripted senders of
//! `sealpass_receiver::conformance`.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sealpass_kernel::fdpass;
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
        // Listening is read from the kernel's table of unix sockets, not by
        // connecting: a connection would be one more thing to count.
        while !listening_at(&target.socket) {
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

    pub(crate) fn open_fds(&self) -> Option<usize> {
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

/// Whether a socket listens at `path`: `/proc/net/unix` lists it with the
/// `__SO_ACCEPTCON` flag (`00010000`) that `listen` sets.
fn listening_at(path: &Path) -> bool {
    const ACCEPTCON: &str = "00010000";
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return fdpass::connect(path).is_ok();
    };
    let wanted = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(3) == Some(&ACCEPTCON) && fields.get(7).copied() == Some(wanted.as_ref())
    })
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

/// A valid transfer on a new connection is accepted.
fn serves_a_valid_transfer(target: &Process) -> Fallible<()> {
    let connection = target.connect()?;
    let (payload, fds) = valid_transfer(1, &[("still-serving", 4096)])?;
    send(&connection, &payload, &fds)?;
    drop(fds);
    match answer(&connection)? {
        Answer::Message(sealpass_proto::Message::Ack(_)) => Ok(()),
        other => Err(format!("a valid transfer got {other:?}")),
    }
}

/// Waits until the receiver holds `baseline` fds again; bounded.
fn back_to(target: &Process, baseline: usize) -> Fallible<()> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match target.open_fds() {
            Some(now) if now == baseline => return Ok(()),
            Some(now) if Instant::now() >= deadline => {
                return Err(format!(
                    "afterwards the receiver holds {now} fds; it held {baseline} before its first connection (leak)"
                ));
            }
            // Its fd table is gone: it exited (or was killed) meanwhile.
            None if Instant::now() >= deadline => {
                return Err(format!(
                    "afterwards the receiver's fds could not be counted (it held {baseline}); it is no longer running"
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// After a case: the receiver is alive, serves a fresh valid transfer, and
/// once the connections close its fd count is back at `baseline`.
fn still_serves(target: &mut Process, baseline: Option<usize>) -> Fallible<()> {
    target.alive()?;
    serves_a_valid_transfer(target)
        .map_err(|e| format!("afterwards a valid transfer failed: {e}"))?;
    match baseline {
        Some(baseline) => back_to(target, baseline),
        None => Ok(()),
    }
}

pub(crate) fn check(command: &[String], scratch: &Path, report: &mut Report) -> anyhow::Result<()> {
    let mut target = Process::start(command, scratch)?;
    // What the receiver holds listening, before any connection: the count
    // it must come back to once every connection has closed.
    let baseline = target.open_fds();
    still_serves(&mut target, baseline).map_err(|e| {
        anyhow::anyhow!("the receiver does not serve a valid transfer cleanly: {e}")
    })?;
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
